"""The marketplace's own settings (a Flask app's usual config.py), read from the environment."""

import os

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///marketplace.db")
# escrowd's database, shared with the `escrowd run` daemon that watches the chains.
ESCROWD_DATABASE_URL = os.environ.get("ESCROWD_DATABASE_URL", "sqlite:///escrowd.db")
ESCROW_ASSET = os.environ.get("ESCROW_ASSET", "USDC")
ESCROW_ASSET_DECIMALS = int(os.environ.get("ESCROW_ASSET_DECIMALS", "6"))
