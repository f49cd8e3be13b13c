"""The diagrams in images/ name only code that exists, and their pictures come from their sources.

Each ``images/*.puml`` marks the names it takes from this repository as monospace: ``""name""``
(or ``<font:monospaced>name</font>``, where PlantUML allows no ``""``: participant names). Each
marked name is looked up by its shape:

- ``POST /v1/chat/completions`` or ``/health``: a route of ``create_app()`` (method and path);
- ``core/engine/process.py``, ``api/``, ``Containerfile``: a file or folder under ``ollama_server/``
  or the repository root;
- ``ollama_server.main``: an importable module;
- ``LLAMAExecutor``: a class (or module-level name) defined in the package;
- ``LLAMAExecutor.ensure_ready()``: that class (or a base) has that member;
- ``start_generation()``: a function or method of that name in the package;
- ``keep_alive``: a key of ``Config``.

The class diagram's classes must be defined in the module of their ``package "x.py"``, their
fields and methods must exist, and each line between two classes must be real (a base class
for ``<|--``, else one class's code names the other). The package diagram must list every
module, and its arrows between packages must be real imports (and every import between two
subpackages must be drawn). No Graphviz or PlantUML is needed: this reads the sources, and
``images/diagrams.sha256`` (written by ``make docs``) ties each picture to its source.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound

import ollama_server
from ollama_server.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ollama_server"
IMAGES = ROOT / "images"
DIAGRAMS = ("architecture", "package_structure", "request_flow", "api_sequence",
            "class_diagram", "deployment")
FORMATS = ("png", "svg")

CODE_MARK = re.compile(r'""(.+?)""|<font:monospaced>(.+?)</font>')
ROUTE = re.compile(r"^(?:(GET|POST|PUT|DELETE|HEAD) )?(/\S*)$")
QUALIFIED = re.compile(r"^([A-Z]\w*)\.(\w+)(\(\))?$")
MODULE_ATTR = re.compile(r"^([a-z_]\w*)\.(\w+)(\(\))?$")
CALL = re.compile(r"^([A-Za-z_]\w*)\(\)$")
CLASS_NAME = re.compile(r"^[A-Z]\w*$")
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
CLASS_DECL = re.compile(r"^(?:abstract\s+class|class|enum|interface)\s+(\w+)\s*(\{)?\s*$")
PACKAGE_DECL = re.compile(r'^package\s+"([^"]+)"(?:\s+as\s+(\w+))?\s*\{\s*$')
RELATION = re.compile(r'^(\w+)\s*(?:"[^"]*"\s*)?([<|*o.\-]*[-.]{2,}[>|*o]*|<\|[-.]+|[-.]+\|>)'
                      r'\s*(?:"[^"]*"\s*)?(\w+)\s*(?::.*)?$')


@dataclass
class ClassDef:
    """A class of the package, as its source defines it."""

    name: str
    module: str  # path relative to ollama_server/, e.g. core/engine/process.py
    bases: list[str]
    members: set[str]
    source: str


@dataclass
class CodeIndex:
    """What the package defines: files, modules, classes, functions, names, routes, imports."""

    modules: set[str] = field(default_factory=set)  # dotted
    classes: dict[str, list[ClassDef]] = field(default_factory=dict)
    functions: set[str] = field(default_factory=set)  # module-level functions and methods
    module_names: dict[str, set[str]] = field(default_factory=dict)  # short module → names
    top_names: set[str] = field(default_factory=set)  # module-level names of every module
    config_keys: set[str] = field(default_factory=set)
    url_map: object = None
    imports: dict[str, set[str]] = field(default_factory=dict)  # dotted module → imported

    def class_members(self, name: str) -> set[str]:
        """Members of every class called ``name``, with those of its bases in the package."""
        out: set[str] = set()
        todo, seen = [name], set()
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            for cls in self.classes.get(current, []):
                out |= cls.members
                todo += cls.bases
        return out


def _members(node: ast.ClassDef) -> set[str]:
    names: set[str] = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
        elif isinstance(item, ast.Assign):
            names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
    for sub in ast.walk(node):  # attributes set on self in any method
        if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name)
                and sub.value.id == "self" and isinstance(sub.ctx, ast.Store)):
            names.add(sub.attr)
    return names


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    out = set()
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return {name for name in out if name.startswith("ollama_server")}


def build_index(tmp_path: Path) -> CodeIndex:
    """Index the package's sources (ast), its modules (pkgutil) and the app's routes."""
    index = CodeIndex()
    for info in pkgutil.walk_packages(ollama_server.__path__, "ollama_server."):
        index.modules.add(info.name)
    index.modules.add("ollama_server")
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        module = _dotted(path)
        rel = path.relative_to(PACKAGE).as_posix()
        index.imports[module] = _imports(tree, module, path.name == "__init__.py")
        short = index.module_names.setdefault(path.stem, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                index.functions.add(node.name)
            elif isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                         for b in node.bases]
                index.classes.setdefault(node.name, []).append(ClassDef(
                    node.name, rel, bases, _members(node),
                    ast.get_source_segment(text, node) or ""))
        for node in tree.body:
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            short.update(names)
            index.top_names.update(names)
    index.config_keys = {f.name for f in dataclasses.fields(Config)}
    index.url_map = _url_map(tmp_path)
    return index


def _url_map(tmp_path: Path):
    """The routes of the real app (built without an engine, as tests/api do)."""
    from ollama_server.api.app import create_app
    from ollama_server.core.request_tracker import RequestTracker
    from ollama_server.models.manager import ModelManager

    (tmp_path / "models").mkdir()
    config = load_config(overrides={"models_dir": str(tmp_path / "models"),
                                    "log_dir": str(tmp_path / "logs")}, environ={})
    manager = ModelManager(config, executor_factory=lambda info, ctx: None,
                           engine_binary=Path("/bin/true"))
    try:
        return create_app(config, manager=manager, tracker=RequestTracker()).url_map
    finally:
        manager.shutdown()


def strip_comments(text: str) -> list[str]:
    """The source's lines without PlantUML comments (``'`` lines) and ``/' … '/`` blocks."""
    text = re.sub(r"/'.*?'/", "", text, flags=re.S)
    return [line for line in text.splitlines() if not line.lstrip().startswith("'")]


def code_names(text: str) -> list[str]:
    """Every name marked as code in a diagram source."""
    names = []
    for line in strip_comments(text):
        for match in CODE_MARK.finditer(line):
            names.append((match.group(1) or match.group(2)).strip())
    return names


def check_name(name: str, index: CodeIndex) -> str | None:
    """None when ``name`` exists in the code, else why not."""
    route = ROUTE.match(name)
    if route:
        method, path = route.group(1), route.group(2)
        adapter = index.url_map.bind("localhost")  # type: ignore[attr-defined]
        for candidate in [method] if method else ["GET", "POST"]:
            try:
                adapter.match(path, method=candidate)
                return None
            except (NotFound, MethodNotAllowed):
                continue
        return f"route {name!r} is not a route of create_app()"
    if "/" in name or re.search(r"\.(py|sh|yml|yaml|service|txt|md)$", name) or \
            (ROOT / name).is_file():
        if (PACKAGE / name).exists() or (ROOT / name).exists():
            return None
        return f"file {name!r} exists neither under ollama_server/ nor at the repository root"
    if name.startswith("ollama_server"):
        return None if name in index.modules else f"module {name!r} does not exist"
    qualified = QUALIFIED.match(name)
    if qualified:
        cls, member = qualified.group(1), qualified.group(2)
        if cls not in index.classes:
            return f"class {cls!r} (in {name!r}) is not defined in ollama_server"
        if member not in index.class_members(cls):
            return f"class {cls!r} has no member {member!r}"
        return None
    module_attr = MODULE_ATTR.match(name)
    if module_attr:
        module, attr = module_attr.group(1), module_attr.group(2)
        if attr in index.module_names.get(module, set()):
            return None
        return f"no module {module}.py of ollama_server defines {attr!r}"
    call = CALL.match(name)
    if call:
        return None if call.group(1) in index.functions else \
            f"function {call.group(1)!r} is not defined in ollama_server"
    if CLASS_NAME.match(name):
        return None if name in index.classes or name in index.top_names else \
            f"class {name!r} is not defined in ollama_server"
    if SNAKE.match(name):
        return None if name in index.config_keys else \
            f"{name!r} is not a configuration key (Config)"
    return f"{name!r} is not a name this test knows how to look up (see its docstring)"


@dataclass
class ClassBox:
    """A class drawn in a class diagram."""

    name: str
    module: str | None  # the label of its package, a file under ollama_server/
    members: list[str]


def parse_class_diagram(text: str) -> tuple[list[ClassBox], list[tuple[str, str, str]]]:
    """(classes with their package and members, relations (left, arrow, right))."""
    boxes: list[ClassBox] = []
    relations = []
    packages: list[str | None] = []  # the open blocks: a package label, or None (a class)
    current: ClassBox | None = None
    for raw in strip_comments(text):
        line = raw.strip()
        if not line:
            continue
        if current is not None:
            if line == "}":
                current = None
                continue
            if re.match(r"^(--|\.\.|==|__)", line):
                continue
            member = re.match(r"^[+\-#~]?\s*(?:\{\w+\}\s*)?(\w+)", line)
            if member:
                current.members.append(member.group(1))
            continue
        package = PACKAGE_DECL.match(line)
        if package:
            packages.append(package.group(1))
            continue
        if line == "}" and packages:
            packages.pop()
            continue
        decl = CLASS_DECL.match(line)
        if decl:
            module = next((p for p in reversed(packages) if p), None)
            box = ClassBox(decl.group(1), module, [])
            boxes.append(box)
            if decl.group(2):
                current = box
            continue
        relation = RELATION.match(line)
        if relation:
            relations.append((relation.group(1), relation.group(2), relation.group(3)))
    return boxes, relations


def check_class_diagram(text: str, index: CodeIndex) -> list[str]:
    """Problems of a class diagram: missing classes or members, relations not in the code."""
    problems = []
    boxes, relations = parse_class_diagram(text)
    drawn = {box.name for box in boxes}
    for box in boxes:
        defs = index.classes.get(box.name, [])
        if box.module:
            defs = [d for d in defs if d.module == box.module]
        if not defs:
            where = f" in {box.module}" if box.module else ""
            problems.append(f"class {box.name} is not defined{where}")
            continue
        members = set().union(*(index.class_members(d.name) for d in defs))
        problems += [f"class {box.name} has no member {m!r}" for m in box.members
                     if m not in members]
    for left, arrow, right in relations:
        for name in (left, right):
            if name not in drawn:
                problems.append(f"relation {left} {arrow} {right}: {name} is not drawn")
        if left not in drawn or right not in drawn:
            continue
        if "|" in arrow:
            parent, child = (left, right) if arrow.startswith("<|") else (right, left)
            if not any(parent in d.bases for d in index.classes.get(child, [])):
                problems.append(f"{child} does not derive from {parent}")
            continue
        sources = [d.source for n in (left, right) for d in index.classes.get(n, [])]
        other = {left: right, right: left}
        if not any(re.search(rf"\b{other[d.name]}\b", d.source)
                   for n in (left, right) for d in index.classes.get(n, [])) or not sources:
            problems.append(f"relation {left} {arrow} {right}: neither class's code names the "
                            f"other")
    return problems


def check_source(text: str, index: CodeIndex) -> list[str]:
    """Every problem of one diagram source."""
    problems = [p for p in (check_name(n, index) for n in code_names(text)) if p]
    if re.search(r"^\s*(class|enum)\s+\w+", text, flags=re.M):
        problems += check_class_diagram(text, index)
    return problems


def _package_aliases(text: str) -> dict[str, str]:
    """alias → dotted module, for the package diagram's elements named after a module."""
    out = {}
    for alias in re.findall(r"\bas\s+(\w+)\s*\{?\s*$", text, flags=re.M):
        if f"ollama_server.{alias}" in ollama_modules():
            out[alias] = f"ollama_server.{alias}"
    return out


def ollama_modules() -> set[str]:
    """Every module and package of ollama_server (dotted)."""
    return {info.name for info in pkgutil.walk_packages(ollama_server.__path__,
                                                        "ollama_server.")}


def imports_between(index: CodeIndex, a: str, b: str) -> bool:
    """True when some module in ``a`` (a package or module) imports something in ``b``."""
    return any((mod == a or mod.startswith(a + ".")) and
               any(t == b or t.startswith(b + ".") for t in targets)
               for mod, targets in index.imports.items())


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> CodeIndex:
    """The code the diagrams are checked against."""
    return build_index(tmp_path_factory.mktemp("diagrams"))


@pytest.mark.parametrize("name", DIAGRAMS)
def test_diagram_names_only_code_that_exists(name, index):
    text = (IMAGES / f"{name}.puml").read_text()
    assert code_names(text) or parse_class_diagram(text)[0], \
        f"{name}.puml marks no code names: nothing would be checked"
    problems = check_source(text, index)
    assert not problems, f"images/{name}.puml is out of date with the code:\n  " + \
        "\n  ".join(problems)


def test_class_diagram_draws_classes_and_relations(index):
    boxes, relations = parse_class_diagram((IMAGES / "class_diagram.puml").read_text())
    names = {box.name for box in boxes}
    assert {"InternalRequest", "ModelManager", "LLAMAExecutor", "RequestTracker",
            "Generation"} <= names
    assert len(relations) >= 20
    assert all(box.module for box in boxes), "every class sits in its module's package"


def test_package_diagram_lists_every_module_and_real_imports(index):
    text = (IMAGES / "package_structure.puml").read_text()
    named = set(code_names(text))
    missing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py" and p.parent != PACKAGE
                     and str(p.relative_to(PACKAGE)) not in named)
    missing += sorted(p.name for p in PACKAGE.glob("*.py")
                      if p.name != "__init__.py" and p.name not in text)
    assert not missing, f"images/package_structure.puml lacks modules: {missing}"
    aliases = _package_aliases(text)
    arrows = re.findall(r"^\s*(\w+)\s*\.\.>\s*(\w+)\s*$", "\n".join(strip_comments(text)),
                        flags=re.M)
    assert arrows
    wrong = [f"{a} ..> {b}" for a, b in arrows
             if a not in aliases or b not in aliases
             or not imports_between(index, aliases[a], aliases[b])]
    assert not wrong, f"arrows that are not imports of the package: {wrong}"
    subpackages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    undrawn = [f"{a} ..> {b}" for a in subpackages for b in subpackages
               if a != b and imports_between(index, f"ollama_server.{a}",
                                             f"ollama_server.{b}")
               and (a, b) not in arrows]
    assert not undrawn, f"imports between packages that the diagram does not draw: {undrawn}"


def _stamp() -> dict[str, str]:
    path = IMAGES / "diagrams.sha256"
    assert path.is_file(), "images/diagrams.sha256 is missing: run `make docs`"
    out = {}
    for line in path.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.strip()] = digest
    return out


@pytest.mark.parametrize("name", DIAGRAMS)
def test_pictures_are_rendered_from_the_current_source(name):
    stamp = _stamp()
    for path in [IMAGES / f"{name}.puml", *(IMAGES / f"{name}.{f}" for f in FORMATS)]:
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run `make docs`"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert stamp.get(path.name) == digest, (
            f"{path.relative_to(ROOT)} changed since `make docs` rendered it: run `make docs` "
            f"and commit the pictures with images/diagrams.sha256")


def test_readme_embeds_every_diagram():
    readme = (ROOT / "README.adoc").read_text()
    for name in DIAGRAMS:
        assert f"image::images/{name}.png[" in readme, f"README.adoc does not show {name}.png"


# --- the checker itself can fail ---------------------------------------------------------

MADE_UP = '''@startuml
participant "<font:monospaced>NoSuchExecutor</font>" as x
x -> x : calls ""LLAMAExecutor.no_such_method()""
x -> x : ""POST /v1/no/such/route"" and ""DELETE /v1/chat/completions""
note right: ""core/no_such_module.py"" ""no_such_config_key"" ""ollama_server.nope""
note left: ""no_such_function()"" ""handlers.no_such_thing()"" ""what is this?""
package "core/engine/process.py" {
  class ModelManager {
    resolve()
  }
}
package "models/manager.py" {
  class ModelManager {
    +no_such_member()
  }
}
package "core/schemas.py" {
  class Usage
  class Finish
  class RequestState
  class Tool
}
Usage <|-- Finish
RequestState --> Tool
@enduml
'''


def test_checker_finds_every_made_up_name(index):
    problems = check_source(MADE_UP, index)
    text = "\n".join(problems)
    for needle in ["NoSuchExecutor", "no_such_method", "/v1/no/such/route",
                   "DELETE /v1/chat/completions", "core/no_such_module.py",
                   "no_such_config_key", "ollama_server.nope", "no_such_function",
                   "no_such_thing", "what is this?",
                   "ModelManager is not defined in core/engine/process.py",
                   "no member 'no_such_member'", "Finish does not derive from Usage",
                   "RequestState --> Tool"]:
        assert needle in text, f"the checker missed {needle!r}; it found:\n{text}"


def test_checker_accepts_real_names(index):
    real = ['""POST /v1/chat/completions""', '""/api/progress/<request_id>""',
            '""GET /v1/models/smollm2:135m""', '""core/engine/process.py""', '""api/""',
            '""Containerfile""', '""systemd/llm-inference.service""', '""ollama_server.main""',
            '""LLAMAExecutor""', '""LLAMAExecutor.ensure_ready()""', '""QueueFull.status""',
            '""start_generation()""', '""handlers.start_generation()""', '""keep_alive""',
            '<font:monospaced>RequestTracker</font>']
    problems = check_source("\n".join(f"note: {r}" for r in real), index)
    assert not problems, problems
