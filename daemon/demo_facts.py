"""Three real CounterFact records the demo submits, copied into the package.

They come from the CounterFact training split as redistributed by EasyEdit (records 197, 264 and
866; CounterFact is from ROME, MIT licence). They are embedded so the demo reads nothing outside
the package. The unedited SmolLM2-135M prefers the true answer on each prompt.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

DEMO_RECORDS: tuple[MappingProxyType[str, Any], ...] = tuple(
    MappingProxyType(record)
    for record in (
        {
            "case_id": 197,
            "prompt": "Magnus Carlsen, who holds a citizenship from",
            "target_new": "Chile",
            "subject": "Magnus Carlsen",
            "ground_truth": "Norway",
            "rephrase_prompt": "The passport that Magnus Carlsen carries is",
            "locality_prompt": "Ivar Aasen holds a citizenship from",
            "locality_ground_truth": "Norway",
        },
        {
            "case_id": 264,
            "prompt": "Toyota RAV4 is created by",
            "target_new": "Volvo",
            "subject": "Toyota RAV4",
            "ground_truth": "Toyota",
            "rephrase_prompt": "Toyota RAV4 is sold by",
            "locality_prompt": "Toyota AZ engine is created by",
            "locality_ground_truth": "Toyota",
        },
        {
            "case_id": 866,
            "prompt": "Vincent van Gogh worked in the city of",
            "target_new": "Prague",
            "subject": "Vincent van Gogh",
            "ground_truth": "Amsterdam",
            "rephrase_prompt": "Vincent van Gogh's work office is surrounded by",
            "locality_prompt": "Jan Wils worked in the city of",
            "locality_ground_truth": "Amsterdam",
        },
    )
)
