"""nlpo.py is ppo.py plus NLPO: every piece the two scripts share is byte for byte the same, so that
`diff ppo.py nlpo.py` shows exactly what NLPO adds (the masking policy, its refresh, the masked sampling and ratio).
Source only, through `ast` and `difflib`: no model runs."""

import ast
import difflib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PPO, NLPO = (ROOT / "ppo.py").read_text(), (ROOT / "nlpo.py").read_text()

# Top-level definitions both files have that may differ, each with the reason.
DIFFERENT_ON_PURPOSE = {
    "main": "the training loop: NLPO samples through its mask, scores the ratio under it and refreshes the masking "
    "policy (the rest of main is ppo.py's, which the line budget below holds)",
    "Args": "NLPO's own fields come after the shared ones (the shared fields are compared one by one below)",
    "LIMITS": "NLPO's own flags are added (the shared entries are compared below)",
}
# ppo.py lines that nlpo.py replaces or drops, at most: the module docstring's title, paper, docs and run lines (7),
# the models import (1), and in main: the checkpoint's parts (1), sample()'s docstring and generate call (3), the
# rollout's unpacking (1), the policy's scoring call, one pass scored under the KL's and the ratio's masks (3), the
# minibatch keep-mask and old log-probs (2), the console line (1) and the summary (1).
# Raise it only for a change to NLPO's method, never for drift.
PPO_LINES_CHANGED_BUDGET = 20


def top_level(source: str) -> dict[str, ast.AST]:
    """name -> node of every top-level function, class and single-name assignment."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = node
    return out


def args_fields(source: str) -> list[tuple[str, str, str, str]]:
    """(name, annotation, default, docstring) of every field of `Args`, in order, from the source."""
    cls = top_level(source)["Args"]
    fields = []
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.AnnAssign):
            doc = cls.body[i + 1] if i + 1 < len(cls.body) else None
            doc = doc.value.value if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) else None
            fields.append(
                (
                    node.target.id,
                    ast.get_source_segment(source, node.annotation),
                    ast.get_source_segment(source, node.value),
                    doc,
                )
            )
    return fields


def test_every_shared_definition_is_identical():
    ppo, nlpo = top_level(PPO), top_level(NLPO)
    shared = sorted(set(ppo) & set(nlpo))
    assert {
        "shaped_rewards",
        "compute_gae",
        "ppo_policy_loss",
        "ppo_value_loss",
        "KLController",
        "forward_logprobs",
        "TopKTopPProcessor",
        "Critic",
    } <= set(shared)
    assert set(DIFFERENT_ON_PURPOSE) <= set(shared), "an exception names something the files do not share"
    differ = [
        name
        for name in shared
        if name not in DIFFERENT_ON_PURPOSE
        and ast.get_source_segment(PPO, ppo[name]) != ast.get_source_segment(NLPO, nlpo[name])
    ]
    assert not differ, f"nlpo.py's copies of these differ from ppo.py's: {differ}"
    # everything ppo.py defines, nlpo.py has too (NLPO adds, it does not take away)
    assert set(ppo) <= set(nlpo), set(ppo) - set(nlpo)


def test_shared_definitions_come_in_ppo_order():
    ppo, nlpo = list(top_level(PPO)), list(top_level(NLPO))
    assert [name for name in nlpo if name in ppo] == ppo


def test_shared_imports_are_ppo_imports():
    def imports(source):
        return [
            ast.get_source_segment(source, n)
            for n in ast.parse(source).body
            if isinstance(n, (ast.Import, ast.ImportFrom))
        ]

    # what only NLPO needs: `math`, and the masking policy's KV-cached steps (`IncrementalLM`)
    nlpo = [line.replace("IncrementalLM, ", "") for line in imports(NLPO) if line != "import math"]
    assert nlpo == imports(PPO)


def test_shared_args_fields_have_the_same_order_defaults_and_docstrings():
    ppo, nlpo = args_fields(PPO), args_fields(NLPO)
    assert all(doc and len(doc.split()) >= 2 for *_, doc in nlpo), "every field has a docstring (its --help text)"
    # nlpo has more fields (its own, after ppo's): the message pairs up ppo's fields only
    assert nlpo[: len(ppo)] == ppo, [(a, b) for a, b in zip(ppo, nlpo, strict=False) if a != b]
    assert [name for name, *_ in nlpo[len(ppo) :]] == ["top_mask", "min_tokens_to_keep", "mask_update_every"]


def test_shared_limits_are_identical():
    def limits(source):
        return eval(ast.unparse(top_level(source)["LIMITS"].value), {"dict": dict})  # our own source, data only

    ppo, nlpo = limits(PPO), limits(NLPO)
    assert {k: nlpo[k] for k in ppo} == ppo
    assert list(nlpo)[: len(ppo)] == list(ppo) and set(nlpo) - set(ppo) == {
        "top_mask",
        "min_tokens_to_keep",
        "mask_update_every",
    }


def test_nlpo_changes_few_ppo_lines():
    """What nlpo.py adds is free; what it changes of ppo.py is NLPO's method only (see the budget above)."""
    changed = [line for line in difflib.ndiff(PPO.splitlines(), NLPO.splitlines()) if line.startswith("- ")]
    assert len(changed) <= PPO_LINES_CHANGED_BUDGET, "\n".join(changed)
