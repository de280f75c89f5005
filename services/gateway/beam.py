"""Beam search in the API (an extension of /v1/completions and /v1/chat/completions, as vLLM's):

    "use_beam_search": true, "n": 2, "beam_width": 4, "length_penalty": 1.0,
    "early_stopping": false | true | "never"

`n` is the number of beams returned (best first, `index` = rank), `beam_width` the beams kept
(default: max(n, 4), within the limit), the rest as transformers' `generate(num_beams=...)`.
Streaming sends the role chunk, then the final beams at the end (a beam is not final before the
search is over). Beam search is deterministic: sampling parameters that would change it are a
400, never silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway.errors import APIError, invalid

BEAM_FIELDS = ("beam_width", "length_penalty", "early_stopping")
DEFAULT_BEAM_WIDTH = 4


@dataclass(slots=True)
class BeamOptions:
    beam_width: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False


def _value_error(name: str, message: str) -> APIError:
    return invalid(f"Invalid value for '{name}': {message}", param=name, code="invalid_value")


def parse_beam(body: dict[str, Any], n: int, max_beam_width: int) -> BeamOptions | None:
    """The beam options of a request body, or None without `use_beam_search`. `n` is the parsed
    `n`. Raises APIError(400) naming the offending parameter."""
    use = body.get("use_beam_search")
    if use is not None and not isinstance(use, bool):
        raise invalid(
            "Invalid type for 'use_beam_search': expected a boolean.",
            param="use_beam_search",
            code="invalid_type",
        )
    if not use:
        for name in BEAM_FIELDS:
            if body.get(name) is not None:
                raise invalid(f"'{name}' requires 'use_beam_search' to be true.", param=name)
        return None

    width = body.get("beam_width")
    if isinstance(width, float) and width.is_integer():  # 4.0 is an integer in JSON, as elsewhere
        width = int(width)
    if width is None:
        width = min(max(n, DEFAULT_BEAM_WIDTH), max_beam_width)
    elif isinstance(width, bool) or not isinstance(width, int):
        raise invalid(
            "Invalid type for 'beam_width': expected an integer.",
            param="beam_width",
            code="invalid_type",
        )
    if not 1 <= width <= max_beam_width:
        raise _value_error(
            "beam_width", f"{width} is out of range; it must be between 1 and {max_beam_width}."
        )
    if n > width:
        raise _value_error(
            "n", f"beam search returns at most beam_width ({width}) beams, but n is {n}."
        )

    # null is "not set", as for every other field (it was a 400 here alone).
    penalty = body.get("length_penalty")
    if penalty is None:
        penalty = 1.0
    if isinstance(penalty, bool) or not isinstance(penalty, int | float):
        raise invalid(
            "Invalid type for 'length_penalty': expected a number.",
            param="length_penalty",
            code="invalid_type",
        )
    if not math.isfinite(penalty) or not -10.0 <= penalty <= 10.0:
        raise _value_error(
            "length_penalty", f"{penalty!r} is out of range; it must be between -10 and 10."
        )

    early = body.get("early_stopping", False)
    if early is None:
        early = False
    if not (isinstance(early, bool) or early == "never"):
        raise _value_error("early_stopping", f'{early!r}; expected true, false or "never".')

    _reject_sampling(body)
    return BeamOptions(width, float(penalty), early)


def _reject_sampling(body: dict[str, Any]) -> None:
    """Beam search scores raw log-probabilities and picks deterministically: a parameter that
    asks for sampling (or reshapes the distribution) contradicts it."""
    temperature = body.get("temperature")
    if temperature is not None and temperature != 0:
        raise _value_error(
            "temperature",
            "beam search is deterministic; omit 'temperature' or set it to 0 with "
            "'use_beam_search'.",
        )
    defaults: dict[str, tuple[Any, ...]] = {
        "top_p": (1, 1.0),
        "top_k": (0, -1),
        "min_p": (0, 0.0),
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "repetition_penalty": (1, 1.0),
        "logprobs": (False,),
        "top_logprobs": (0,),
        "logit_bias": ({},),
    }
    for name, neutral in defaults.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            raise invalid(
                f"'{name}' cannot be combined with 'use_beam_search': beam search does not sample.",
                param=name,
            )
    if body.get("seed") is not None:
        raise invalid(
            "'seed' cannot be combined with 'use_beam_search': beam search is deterministic.",
            param="seed",
        )


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # bool is an int in Python: `true` is not 1 here, and completions' `logprobs: 0` (an int)
    # does ask for logprobs.
    return value in neutral and isinstance(value, bool) == isinstance(neutral[0], bool)


def apply_beam(params: pb.SamplingParams, beam: BeamOptions | None) -> None:
    """The beam options into the executor's SamplingParams (temperature 0: no sampling)."""
    if beam is None:
        return
    params.use_beam_search = True
    params.beam_width = beam.beam_width
    params.length_penalty = beam.length_penalty
    params.early_stopping = beam.early_stopping is True
    params.early_stopping_never = beam.early_stopping == "never"
    params.temperature = 0.0
