"""The package's flows, ready to run or deploy by module path.

=========================  =====================================================================
Flow                       Entrypoint
=========================  =====================================================================
``generate_and_store``     ``prefect_journey.flows.generate_and_store:generate_and_store``
``character_series``       ``prefect_journey.flows.character_series:character_series``
``batch_campaign``         ``prefect_journey.flows.campaign:batch_campaign``
``abatch_campaign``        ``prefect_journey.flows.campaign:abatch_campaign``
``store_finished_task``    ``prefect_journey.flows.store_finished_task:store_finished_task``
=========================  =====================================================================

Example:
    ```python
    from prefect_journey.flows import generate_and_store

    generate_and_store("a lighthouse at dusk", destination="./outputs")
    ```
"""

from prefect_journey.campaigns.pipeline import CampaignFailedError, CampaignReport, ItemOutcome
from prefect_journey.flows.campaign import abatch_campaign, batch_campaign
from prefect_journey.flows.character_series import character_series
from prefect_journey.flows.generate_and_store import generate_and_store
from prefect_journey.flows.store_finished_task import store_finished_task

__all__ = [
    "CampaignFailedError",
    "CampaignReport",
    "ItemOutcome",
    "abatch_campaign",
    "batch_campaign",
    "character_series",
    "generate_and_store",
    "store_finished_task",
]
