"""What the report computes: a study's runs loaded from MLflow and put in order, their evaluations, the deltas
against RT-DETR with their intervals and verdicts, latency, power. Nothing here formats or draws (that is
:mod:`analysis.present`); imports point from here down to ``studies`` and ``dset`` only."""



