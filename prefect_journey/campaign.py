"""Deprecated: campaign input lives in :mod:`prefect_journey.campaigns.plan`."""

from prefect_journey.deprecations import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "CampaignError": "prefect_journey.campaigns.plan:CampaignError",
        "CampaignItem": "prefect_journey.campaigns.plan:CampaignItem",
        "DEFAULT_KEY_TEMPLATE": "prefect_journey.campaigns.plan:CAMPAIGN_KEY_TEMPLATE",
        "MAX_CAMPAIGN_BYTES": "prefect_journey.campaigns.plan:MAX_CAMPAIGN_BYTES",
        "MAX_ITEMS": "prefect_journey.campaigns.plan:MAX_ITEMS",
        "plan_items": "prefect_journey.campaigns.plan:plan_items",
        "read_items": "prefect_journey.campaigns.plan:read_items",
    },
)
