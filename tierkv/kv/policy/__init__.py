"""Policy: which precision each cached token gets (``spec``), each slot's tier bookkeeping and
budgets (``tiers``), and the compaction that carries out its decisions (``compact``)."""
