"""The service: what a request does between its dialect and the engine, without HTTP.

``generation`` resolves the model, fits the request to it (``fitting``), admits and loads
through the model manager, tracks the request, and runs the engine's stream (reasoning split,
tool calls, ``n`` choices, timeouts, cancellation). The blueprints in ``api/`` only parse,
call this and frame.
"""
