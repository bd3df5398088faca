"""Regenerating the paper's data pinned to the authors' choices: how the switches added for it
count in the stage keys (:func:`pinned_settings`)."""

from __future__ import annotations

from typing import Any

# The switches of pinned regeneration, by section. At their defaults they stay out of the
# stage settings, so outputs made before they existed keep their keys.
_KEYLESS_AT_DEFAULT = {
    "masks": ("detector_size_rounding", "detector_batching", "clamp_boxes", "keep_ungrounded_images"),
}


def pinned_settings(config: Any, sections: dict[str, dict]) -> None:
    """Adjust stage settings (``stages.stage_settings``) in place for pinned regeneration:
    the new switches count only when not at their defaults."""
    for name, fields in _KEYLESS_AT_DEFAULT.items():
        if name not in sections:
            continue
        section = getattr(config, name)
        for field in fields:
            if getattr(section, field) == type(section).model_fields[field].default:
                del sections[name][field]
