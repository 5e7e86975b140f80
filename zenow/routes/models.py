"""Spec sections 1.1-1.3, 1.6, 1.7 and 4: the model registry, loading, parameters, server status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response, jsonify, request
from quart_schema import validate_request

from ..errors import InvalidMode, InvalidRequest, ModelNotFound, ZenowError
from ..settings import Mode, is_mode
from ._context import services
from ._shapes import (
    Loaded,
    Model,
    ModelInfoQuery,
    ModelList,
    ModeQuery,
    OptionalModeQuery,
    Parameters,
    ParameterUpdate,
    ServerStatusShape,
    Updated,
    documented,
    model_json,
    server_status_json,
)

bp = Blueprint("models", __name__)


def mode_arg(value: object = None) -> Mode:
    """The `mode` query argument (default `llm`), or `value`, checked; raises `InvalidMode`."""
    mode = request.args.get("mode", "llm") if value is None else value
    if not is_mode(mode):
        raise InvalidMode(mode)
    return mode


def optional_mode_arg() -> Mode | None:
    """The `mode` query argument when given, checked; raises `InvalidMode`."""
    return mode_arg() if "mode" in request.args else None


class LoadModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model_name: str = Field(min_length=1, max_length=200)
    download_url: str | None = None
    mode: str = "llm"


@bp.get("/api/models/current")
@documented(Model, 404, query=ModeQuery)
async def current_model() -> dict[str, Any]:
    mode = mode_arg()
    model = await services().store.current_model(mode)
    if model is None:
        raise ModelNotFound(f"No {mode} model is loaded")
    return model_json(model) or {}


@bp.get("/api/models/list")
@documented(ModelList, query=OptionalModeQuery)
async def list_models() -> dict[str, Any]:
    mode = optional_mode_arg()
    store = services().store
    models = await store.list_models(mode)
    current = await store.current_model(mode or "llm")
    return {"models": [model_json(m) for m in models], "current_model": model_json(current)}


@bp.get("/api/models/info")
@documented(Model, 404, query=ModelInfoQuery)
async def model_info() -> dict[str, Any]:
    """One registered model, with what its GGUF header says (`details`)."""
    mode = mode_arg()
    name = request.args.get("model_name")
    if not name:
        raise InvalidRequest("model_name: required (the name of a registered model)", param="model_name")
    model = await services().store.find_model(mode, name)
    if model is None:
        raise ModelNotFound(f"Model {name!r} not found for mode {mode}")
    return model_json(model) or {}


@bp.post("/api/models/load")
@documented(Loaded, 404)
@validate_request(LoadModel)
async def load_model(data: LoadModel) -> Response | dict[str, Any]:
    mode = mode_arg(data.mode)
    name = data.model_name.strip()
    if name != data.model_name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise InvalidRequest("model_name: must be a plain name (no path separators, no leading dot or spaces)")
    try:
        status = await services().servers[mode].load(name, data.download_url)
    except ZenowError as exc:
        # The original desktop front end reads `success` and `message`; the spec's clients read `detail`.
        response = jsonify({"detail": exc.detail, "success": False, "message": exc.detail})
        response.status_code = exc.status_code
        return response
    answer = {
        "success": True,
        "message": "Model loaded successfully",
        "model_name": status.model_name,
        "model_path": status.model_path,
        "server_status": status.status,
    }
    if warning := services().servers[mode].context_warning():
        answer["warning"] = warning
    return answer


@bp.get("/api/server/status")
@bp.get("/api/models/server_status")
@documented(ServerStatusShape, query=ModeQuery)
async def server_status() -> dict[str, Any]:
    return server_status_json(services().servers[mode_arg()].status())


@bp.get("/api/models/get_param")
@documented(Parameters, query=ModeQuery)
async def get_parameters() -> dict[str, Any]:
    return services().servers[mode_arg()].parameters()


@bp.post("/api/models/update_param")
@documented(Updated, 507, query=ModeQuery, body=ParameterUpdate)
async def update_parameters() -> dict[str, Any]:
    mode = mode_arg()
    changes = await request.get_json()
    server = services().servers[mode]
    requires_restart = await server.update_parameters(changes)
    answer: dict[str, Any] = {"success": True, "message": "Parameters updated successfully",
                              "requires_restart": requires_restart}
    if isinstance(changes, dict) and "context_size" in changes and (warning := server.context_warning()):
        answer["warning"] = warning
    return answer


