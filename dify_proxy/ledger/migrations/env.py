"""Alembic's environment for the ledger: always given a connection by `ledger.migrate`, so the
one command (`python -m dify_proxy.ledger migrate`) works with and without DATABASE_URL."""

from alembic import context

from dify_proxy.ledger.schema import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
