"""Campaigns: hundreds of prompts, generated and stored under a budget and a concurrency limit.

The data goes one way through the modules:

- :mod:`~prefect_journey.campaigns.plan`: read and check the items (no Prefect).
- :mod:`~prefect_journey.campaigns.pipeline`: look up, preflight, outcome, report; the report
  types.
- :mod:`~prefect_journey.campaigns.item`: an item's life, written once.
- :mod:`~prefect_journey.campaigns.executor`: how items are grouped into task runs, and how
  many run at once.
- :mod:`~prefect_journey.campaigns.run`: a run from its plan to its report, for every flow.

The flows are in :mod:`prefect_journey.flows`; the report types are also importable from
:mod:`prefect_journey` itself.
"""
