"""Server strategies: how the accepted deltas of a round become the next global model.

Two pure steps (numpy, no I/O). A combiner (``robust.py``) turns the round's deltas and
their sample counts into one delta; a server optimiser, one module each, applies it and
holds whatever state it carries between rounds (server momentum, Adam moments) so the
aggregator can persist it next to the model it produced:

- ``fedavg``  (McMahan et al. 2016): ``w + server_lr * combined``.
- ``fedavgm`` (Hsu et al. 2019): server momentum over the combined delta.
- ``fedadam`` (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the server,
  with the combined delta as the pseudo-gradient (lazy: only coordinates someone sent move).

Modules: ``base`` (the ``Strategy`` and ``Combiner`` interfaces, ``Weights``), ``config``
(``StrategyConfig``), ``factory`` (``make_strategy``), ``robust`` (the combiners), and one
per optimiser. Nothing here imports ``factory`` but its callers, so there is no import circle.

The ``[strategy]`` table of the aggregator config::

    name = "fedadam"        # the server optimiser: fedadam (default), fedavg or fedavgm
    server_lr = 0.05        # default per optimiser: fedadam 0.05, fedavg and fedavgm 1.0
    momentum = 0.9          # fedavgm
    beta1 = 0.9             # fedadam
    beta2 = 0.99            # fedadam
    tau = 0.001             # fedadam: adaptivity
    robust = "mean"         # how the round's deltas are combined, in every optimiser:
                            #   "mean" (sample-weighted, FedAvg's), "median" (coordinate-wise
                            #   weighted median) or "trimmed_mean"
    trim_fraction = 0.2     # trimmed_mean: share of the weight cut at EACH end, 0 <= x < 0.5
    norm_bound = 0.0        # 0: off; > 0: each delta is scaled down to at most norm_bound x
                            #   the median L2 norm of the round's deltas (e.g. 3), before combining

The median and the trimmed mean weigh devices by sample count and, per coordinate, use only
the devices that sent it (compact codecs send about 2% of the entries; skips are zero
deltas), scaled by those devices' share of the round's samples, so they learn at the mean's
pace under top-k. A coordinate nobody sent stays 0. Details in ``robust.py``.
"""
