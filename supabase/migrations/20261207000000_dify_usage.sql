-- dify-proxy's usage ledger: one row per answer, written by the proxy (which connects as the
-- table's owner through DATABASE_URL and so is not bound by row-level security). Signed-in users
-- read their own rows with supabase-js; nobody sees anyone else's.
-- The same table as dify_proxy/ledger/migrations (the proxy's `python -m dify_proxy.ledger
-- migrate`); either may run first.

create table if not exists public.dify_usage (
  answer_id text primary key,
  request_id text,
  user_id text not null,
  app_mode text not null default 'chat',
  conversation_id text,
  message_id text,
  task_id text,
  workflow_run_id text,
  started_at timestamptz not null,
  ended_at timestamptz not null,
  end_reason text not null,
  first_event_ms integer,
  prompt_tokens integer not null default 0,
  completion_tokens integer not null default 0,
  total_tokens integer not null default 0,
  total_price numeric,
  currency varchar(16),
  resumes integer not null default 0
);

create index if not exists dify_usage_user_started on public.dify_usage (user_id, started_at);

comment on table public.dify_usage is
  'dify-proxy: one row per Dify answer (tokens and price as Dify reported them)';

alter table public.dify_usage enable row level security;

drop policy if exists dify_usage_select_own on public.dify_usage;
create policy dify_usage_select_own on public.dify_usage
  for select to authenticated
  using (user_id = (select auth.uid())::text);

grant select on table public.dify_usage to authenticated;
