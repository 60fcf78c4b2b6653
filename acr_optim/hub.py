"""Model cards for models trained (or evaluated) with acr-optim, for the Hugging Face Hub.

:func:`write_model_card` fills ``hub_cards/acr_model_card.md`` into ``output_dir/README.md``: YAML
metadata that ``huggingface_hub.ModelCard`` parses (``library_name``, ``tags``, ``datasets``,
``model-index`` with the clean result and one result per corruption ``eps``), the ACR
configuration, the robustness table, intended use and the paper citation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .checks import check_eps, check_n, check_p

__all__ = ["DEFAULT_TEMPLATE", "significant", "write_model_card"]

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "hub_cards" / "acr_model_card.md"
"""The card template shipped with the package (``hub_cards/`` at the top of the repository links to it)."""

_DEFAULT_INTENDED_USE = (
    "A research artefact: comparing the robustness of models trained with and without ACR under the "
    "same budget, and reproducing the experiments of the paper. Not intended for production use."
)


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (``21.4873...`` -> ``21.49``), for metadata people read."""
    return float(f"{value:.{digits}g}")


def write_model_card(
    output_dir: str | Path,
    *,
    model_name: str,
    task_type: str,
    metric_type: str,
    metric_name: str,
    results: Sequence[tuple[float, float, float]],
    dataset_name: str,
    dataset_type: str,
    dataset_split: str = "validation",
    dataset_config: str | None = None,
    hub_datasets: Sequence[str] = (),
    corruption_p: float = 2.0,
    corruption_n: int | None = None,
    acr: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    language: str | Sequence[str] | None = None,
    license: str = "apache-2.0",
    description: str = "",
    intended_use: str = _DEFAULT_INTENDED_USE,
    training: Mapping[str, Any] | None = None,
    faults: Sequence[tuple[str, str, float, float]] = (),
    test_result: float | None = None,
    usage: str | None = None,
    template_path: str | Path = DEFAULT_TEMPLATE,
) -> Path:
    """Write ``output_dir/README.md`` and return its path.

    Args:
        results: ``[(eps, value, loss_increase)]``: the metric of the clean model (``eps = 0``,
            required, first) and under the gradient-based corruption of norm ``eps``
            (``p = corruption_p``, at most ``corruption_n`` parameters), with the measured loss
            increase ``L(w + a) - L(w)``; each becomes a ``model-index`` entry, the corrupted ones
            with ``metric_config = "gradient-corruption p=<p> n=<n> eps=<eps>"``.  Values are
            written with 4 significant digits; non-finite ones (a broken model's perplexity) appear
            in the card's tables only.
        task_type: hub identifier of the task (``"translation"``).
        metric_type: hub identifier of the metric (``"bleu"``).
        metric_name: its human-readable name (``"BLEU"``).
        dataset_name: name of the evaluation data.
        dataset_type: its hub id where there is one (``"local"`` for files).
        dataset_split: the evaluated split.
        dataset_config: the dataset's config (``"de-en"``), if any.
        hub_datasets: hub ids of the training data for the ``datasets`` metadata (empty for local files).
        acr: ``{"eps", "p", "alpha", "n"}`` of ACR training, or ``{"fault", "fault_mode",
            "fault_radius", "alpha"}`` when it trained against a fault's error set; ``None`` for a baseline.
        training: other hyperparameters listed in the card (name -> value).
        faults: ``[(spec, label, value, loss_increase)]``: the metric under real-world faults of
            :mod:`acr_optim.faults` (``("int4:g32", "int4 weights, group 32", ...)``), each a
            ``model-index`` entry named ``"<metric_name> (<label>)"`` with ``metric_config = "fault <spec>"``.
        test_result: the clean metric on the test split, a ``model-index`` entry of its own.
        usage: Python code that loads and runs the model, shown under "How to use".
    """
    if not results or results[0][0] != 0:
        raise ValueError("results must start with the clean result (eps = 0)")
    for eps, *_ in results[1:]:
        check_eps(eps, name="results eps")
    corruption_p, corruption_n = check_p(corruption_p, name="corruption_p"), check_n(corruption_n, name="corruption_n")
    template_path = Path(template_path)
    if not template_path.is_file():
        raise FileNotFoundError(f"model card template not found: {template_path} (pass template_path=...)")

    def result(value: float, name: str, config: str | None, split: str = dataset_split) -> EvalResult:
        return EvalResult(
            task_type=task_type,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=dataset_config,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=name,
            metric_value=significant(value),
            metric_config=config,
        )

    n_label = "all" if corruption_n is None else corruption_n
    eval_results = [result(results[0][1], metric_name, None)]
    if test_result is not None:
        eval_results.append(result(test_result, f"{metric_name} (test)", None, split="test"))
    for eps, value, _ in results[1:]:
        eval_results.append(
            result(
                value,
                f"{metric_name} (gradient corruption, L{corruption_p:g} eps={eps:g})",
                f"gradient-corruption p={corruption_p:g} n={n_label} eps={eps:g}",
            )
        )
    for spec, label, value, _ in faults:
        eval_results.append(result(value, f"{metric_name} ({label})", f"fault {spec}"))
    eval_results = [r for r in eval_results if math.isfinite(r.metric_value)]  # the hub takes numbers only
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        datasets=list(hub_datasets) or None,
        language=language,
        license=license,
        library_name="transformers",
        metrics=[metric_type],
        tags=["acr-optim", "parameter-corruption", "robustness", task_type, "acr" if acr else "baseline"],
        eval_results=eval_results,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        description=description,
        acr=dict(acr) if acr else None,
        metric_name=metric_name,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        corruption_p=f"{corruption_p:g}",
        corruption_n=corruption_n,
        results=list(results),
        faults=list(faults),
        test_result=test_result,
        training={k: significant(v) if isinstance(v, float) else v for k, v in (training or {}).items()},
        usage=usage,
        intended_use=intended_use,
    )
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path
