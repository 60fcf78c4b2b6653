"""The research tier of acr-optim: what every experiment (``experiments/``) and benchmark (``benchmarks/``) shares.

* :mod:`lab.records`: one JSON record per finished run, claims, atomic writes, commits;
* :mod:`lab.stats`: mean ± std, the paired t interval, Welch's interval, Holm's correction;
* :mod:`lab.docs`: the one convention for generated sections of a markdown page (``<!-- table:NAME -->``).

The library (``acr_optim``) never imports this package; scripts import it by name (``from lab import stats``).
See docs/layout.md for who imports whom.
"""
