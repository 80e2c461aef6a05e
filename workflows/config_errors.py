"""How a YAML config that fails pydantic validation is reported: one line per error, naming the key path.

Shared by the Serve config (``services/serve_config.py``) and the promotion policy (``workflows/lifecycle/policy.py``).
"""

from __future__ import annotations

from pydantic import ValidationError


def format_errors(exc: ValidationError, source: str, what: str, fields_in: str) -> str:
    """``source: invalid <what> (N errors):`` then ``  key.path: message`` per error.

    Args:
        exc: the validation error.
        source: the file (or "<dict>") the config came from.
        what: what the config is ("config", "promotion policy").
        fields_in: the file that documents the fields, named in the message for an unknown key.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown key (check the spelling; see {fields_in} for the fields)"
        lines.append(f"  {loc}: {message}")
    return f"{source}: invalid {what} ({len(lines)} error{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines)
