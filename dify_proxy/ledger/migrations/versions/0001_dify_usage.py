"""The usage ledger: public.dify_usage, one row per answer.

On PostgreSQL the table is the one supabase/migrations/*_dify_usage.sql creates (a test keeps
the two in step), and either may come first: a table already there is left as it is. Row-level
security is always on, so that Supabase's Data API shows the table to nobody but through the
policy; the policy itself needs Supabase's `authenticated` role and `auth.uid()`, so it is made
only where they exist (not on Heroku Postgres, where nobody reads through the Data API).

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from dify_proxy.ledger.schema import ExactPrice, UtcTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

POLICY = """
do $$
begin
  if exists (select 1 from pg_roles where rolname = 'authenticated')
     and to_regprocedure('auth.uid()') is not null
     and not exists (
       select 1 from pg_policies
       where schemaname = 'public' and tablename = 'dify_usage'
         and policyname = 'dify_usage_select_own'
     ) then
    create policy dify_usage_select_own on public.dify_usage
      for select to authenticated
      using (user_id = (select auth.uid())::text);
    grant select on table public.dify_usage to authenticated;
  end if;
end
$$;
"""


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("dify_usage"):
        op.create_table(
            "dify_usage",
            sa.Column("answer_id", sa.Text(), primary_key=True),
            sa.Column("request_id", sa.Text()),
            sa.Column("user_id", sa.Text(), nullable=False),
            sa.Column("app_mode", sa.Text(), nullable=False, server_default="chat"),
            sa.Column("conversation_id", sa.Text()),
            sa.Column("message_id", sa.Text()),
            sa.Column("task_id", sa.Text()),
            sa.Column("workflow_run_id", sa.Text()),
            sa.Column("started_at", UtcTime(), nullable=False),
            sa.Column("ended_at", UtcTime(), nullable=False),
            sa.Column("end_reason", sa.Text(), nullable=False),
            sa.Column("first_event_ms", sa.Integer()),
            sa.Column("prompt_tokens", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("completion_tokens", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("total_tokens", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("total_price", ExactPrice()),
            sa.Column("currency", sa.String(16)),
            sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"),
        )
        op.create_index("dify_usage_user_started", "dify_usage", ["user_id", "started_at"])
    if bind.dialect.name == "postgresql":
        op.execute("alter table public.dify_usage enable row level security")
        op.execute(POLICY)


def downgrade() -> None:
    op.drop_table("dify_usage")
