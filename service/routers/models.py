"""Models: what is served, with sizes, frame counts, step range and acceleration quality cards."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ReadyDep, refresh_live_quality
from service.engine import Engine, ModelEntry
from service.errors import not_found, shown
from service.schemas import ListResponse, ModelCard

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_card(engine: Engine, entry: ModelEntry, default_level: str) -> ModelCard:
    return ModelCard(
        id=entry.name,
        created=entry.created,
        kind=entry.kind,  # type: ignore[arg-type]
        description=entry.description,
        sizes=[f"{w}x{h}" for w, h in entry.sizes],
        num_frames=entry.num_frames if entry.kind == "video" else None,
        fps=entry.fps if entry.kind == "video" else None,
        default_steps=entry.default_steps,
        step_range=(entry.min_steps, entry.max_steps),
        default_guidance_scale=entry.default_guidance,
        default_acceleration=default_level,
        revision=entry.revision,
        image_input=entry.reference_mode is not None,
        acceleration=engine.acceleration_levels(entry),  # type: ignore[arg-type]
    )


@router.get("", response_model=ListResponse, summary="List models")
async def list_models(services: ReadyDep) -> ListResponse:
    await refresh_live_quality(services)
    engine = services.engine
    cards = [model_card(engine, e, services.settings.default_level) for e in engine.models.values()]
    return ListResponse(data=cards)


@router.get("/{model_id}", response_model=ModelCard, summary="Retrieve a model")
async def get_model(model_id: str, services: ReadyDep) -> ModelCard:
    entry = services.engine.models.get(model_id)
    if entry is None:
        raise not_found(f"model {shown(model_id)} not found", "model_id", "model_not_found")
    await refresh_live_quality(services)
    return model_card(services.engine, entry, services.settings.default_level)
