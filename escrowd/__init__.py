"""escrowd: the money side of an AI-agent marketplace.

The repository keeps one folder per part (config, models, migrations, wallets, indexer,
escrow, daemon, devnet); installed, they are the subpackages of this one import name, so
a backend with modules of its own named `models` or `config` can use escrowd in-process.

For a marketplace backend: `escrowd.escrow.EscrowService` / `AsyncEscrowService` (in
process), `escrowd.client.EscrowdClient` / `AsyncEscrowdClient` (over HTTP) and
`escrowd.client.verify_webhook`. For operators: the `escrowd` command
(`escrowd.daemon.cli:main`).
"""

__version__ = "0.1.0"
