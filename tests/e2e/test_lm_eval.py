"""An evaluation harness runs against the gateway unchanged: lm-evaluation-harness's
`local-completions` model (OpenAI-compatible /v1/completions: loglikelihood through `echo` with
`logprobs`, generation through plain completions) on two small tasks this test writes, scored
against the harness's own `hf` model on the same SmolLM2 weights (transformers on the CPU).

Issue 22: "scores equal to the harness's own hf model on the same SmolLM2 weights within 1%".
The per-sample loglikelihoods are compared too, which is stricter than the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import API_KEY, MODEL
from tests.support.mesh import Mesh

lm_eval = pytest.importorskip("lm_eval")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CAPITALS = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Greece", "Athens"),
]
CHOICES = ["Paris", "Rome", "Madrid", "Berlin", "Tokyo", "Cairo", "Ottawa", "Athens"]

MC_TASK = """task: pagemesh_capitals_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_TASK = """task: pagemesh_capitals_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA: The capital of {{{{country}}}} is"
doc_to_target: " {{{{capital}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""


def _tasks(tmp: Path) -> Path:
    mc = tmp / "mc.jsonl"
    gen = tmp / "gen.jsonl"
    with mc.open("w") as f:
        for i, (country, capital) in enumerate(CAPITALS):
            # Four choices each, the right one in turn at every position.
            wrong = [c for c in CHOICES if c != capital][i % 5 : i % 5 + 3]
            choices = [*wrong]
            choices.insert(i % 4, capital)
            f.write(json.dumps({"country": country, "choices": choices, "answer": i % 4}) + "\n")
    with gen.open("w") as f:
        for country, capital in CAPITALS:
            f.write(json.dumps({"country": country, "capital": capital}) + "\n")
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=mc))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=gen))
    return tasks


def _evaluate(model: str, model_args: str, tasks: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["pagemesh_capitals_mc", "pagemesh_capitals_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=1,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def test_lm_eval_local_completions_matches_hf(
    mesh: Mesh, smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    tasks = _tasks(tmp_path)
    ours = _evaluate(
        "local-completions",
        f"model={MODEL},base_url={mesh.url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={smollm2_path},max_retries=1,timeout=120",
        tasks,
    )
    hf = _evaluate("hf", f"pretrained={smollm2_path},dtype=float32,device=cpu", tasks)
    for task, metrics in (
        ("pagemesh_capitals_mc", ("acc,none", "acc_norm,none")),
        ("pagemesh_capitals_gen", ("exact_match,none",)),
    ):
        for metric in metrics:
            a, b = ours["results"][task][metric], hf["results"][task][metric]
            assert abs(a - b) <= 0.01, (task, metric, a, b)
    # Not vacuous: the model knows most capitals, and the choices were scored, not defaulted.
    assert ours["results"]["pagemesh_capitals_gen"]["exact_match,none"] >= 0.5
    assert ours["results"]["pagemesh_capitals_mc"]["acc,none"] >= 0.5
    # Every choice's loglikelihood (summed over the choice's tokens) as the hf model has it.
    mine = ours["samples"]["pagemesh_capitals_mc"]
    theirs = hf["samples"]["pagemesh_capitals_mc"]
    assert len(mine) == len(theirs) == len(CAPITALS)
    for x, y in zip(mine, theirs, strict=True):
        lx = [r[0][0] for r in x["resps"]]
        ly = [r[0][0] for r in y["resps"]]
        assert len(lx) == 4 and all(v < 0 for v in lx)
        for u, v in zip(lx, ly, strict=True):
            assert abs(u - v) <= 0.01 * max(1.0, abs(v)), (x["doc"], lx, ly)
