r"""``peft`` LoRA models: what ACR's corruption means for them, and probing the weights they deploy.

Training.  :class:`~acr_optim.ACR` (and :class:`~acr_optim.ACRCallback`) corrupt the parameters
that have gradients.  In a LoRA model those are the adapters ``A`` (``r x in``) and ``B``
(``out x r``) of each adapted layer; the frozen base weight ``W`` is neither corrupted nor
trained, and stays bitwise as it was.  The layer computes ``(W + s B A) x`` with
``s = lora_alpha / r``, so a corruption ``(dA, dB)`` of the adapters moves the merged weight
``W' = W + s B A`` by

    dW' = s (dB A + B dA) + s dB dA,

that is, to first order, by a corruption of the merged weights restricted to the directions a
rank-``r`` update ``B A`` can move in (only ``dB A`` while ``B = 0``, at initialisation).  ACR with
LoRA thus seeks robustness within the adapter's subspace, with the constraint
``||(dA, dB)||_p = eps`` measured on the adapters, not on ``dW'``.

Probing.  The deployed model is the merged one: :mod:`acr_optim.probe.merged` probes it in the
unmerged model's base weights (:func:`merged_parameters`, :func:`probe_target`, re-exported here).
"""

from __future__ import annotations

from ..probe.merged import is_peft_model, merged_parameters, probe_target

__all__ = ["is_peft_model", "merged_parameters", "probe_target"]
