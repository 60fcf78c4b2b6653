"""The research tier of acr-optim: what every experiment (``experiments/``) and benchmark (``benchmarks/``) shares.

* :mod:`lab.records`: one JSON record per finished run, claims, atomic writes, commits, run ids;
* :mod:`lab.stats`: mean ± std, the paired t interval, Welch's interval, the t-test, Holm's correction;
* :mod:`lab.docs`: the one convention for generated sections of a markdown page (``<!-- table:NAME -->``);
* :mod:`lab.cli`: the common flags and argument types;
* :mod:`lab.tasks`: the fixed-budget tasks (tiny Marian on Multi30k, tiny GPT-2 on WikiText-2);
* :mod:`lab.loop`: the fixed-budget training loop and the fixed-budget run as a record;
* :mod:`lab.methods`: the methods of the converged runs and of finding 4;
* :mod:`lab.fragility`: finding 2's per-group corruption.

The library (``acr_optim``) never imports this package; scripts import it by name (``from lab import stats``).
docs/layout.md says who imports whom and where a new experiment, method or task goes.
"""
