"""The marketplace's own settings, read from the environment."""

import os

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///marketplace.db")
ESCROWD_URL = os.environ.get("ESCROWD_URL", "http://127.0.0.1:8725")
ESCROWD_API_KEY = os.environ.get("ESCROWD_API_KEY", "")
# The secret POST /v1/webhook-endpoints returned for this app's /webhooks/escrowd.
ESCROWD_WEBHOOK_SECRET = os.environ.get("ESCROWD_WEBHOOK_SECRET", "")
ESCROW_ASSET = os.environ.get("ESCROW_ASSET", "USDC")
