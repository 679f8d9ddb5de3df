"""Admin API (keys with the admin flag): inspect variants, load a version or adapter by hand."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.backends.base import BackendError, BackendInputError
from serving.errors import APIError
from serving.protocol import AdminVariantRequest
from serving.registry import ModelResolveError
from serving.routes.common import context, gateway, parse, read_json

router = APIRouter()


@router.get("/admin/variants")
async def list_variants(request: Request) -> JSONResponse:
    context(request, "admin", admin=True)
    gw = gateway(request)
    return JSONResponse({"variants": [slot.info() for slot in gw.pool.slots.values()],
                         "weights": gw.router.weights, "backend": gw.kind})


@router.post("/admin/variants/{name}")
async def update_variant(name: str, request: Request) -> JSONResponse:
    """Load ``model_uri`` and/or switch to ``adapter`` and/or set ``weight``; returns the swap timings."""
    context(request, "admin", admin=True)
    gw = gateway(request)
    if name not in gw.pool.slots:
        raise APIError(404, f"unknown variant {name!r}; variants: {', '.join(gw.pool.slots)}", param="name")
    body = parse(AdminVariantRequest, await read_json(request))
    if body.adapter is not None:  # read with the gateway's rights: only from the allowed roots
        gw.allowed_adapter_path(body.adapter, "adapter")
    result: dict = {"variant": name}
    try:
        if body.model_uri is not None:
            result["model"] = await gw.pool.load(name, model_uri=body.model_uri, adapter=body.adapter,
                                                 reason="admin")
        elif body.adapter is not None:
            result["adapter"] = await gw.pool.set_adapter(name, body.adapter)
    except (ModelResolveError, BackendInputError) as err:
        raise APIError(400, str(err), param="model_uri" if body.model_uri else "adapter") from None
    except BackendError as err:
        raise APIError(502, f"loading failed, the previous model keeps serving: {err}") from None
    if body.weight is not None:
        weights = [(n, body.weight if n == name else s.weight) for n, s in gw.pool.slots.items()]
        try:
            gw.router.set_weights(weights)
        except ValueError as err:
            raise APIError(400, str(err), param="weight") from None
        gw.pool.slots[name].weight = body.weight
        result["weights"] = gw.router.weights
    return JSONResponse(result)
