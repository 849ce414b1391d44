-- The tables as metric-etl 2ad411b made them (`metric-etl init-db --sql` at that commit), before
-- partitions and rollups: the metrics table is a plain table keyed by its message
-- (topic, partition, incarnation, "offset"). {schema} is the schema, quoted.
CREATE TABLE IF NOT EXISTS {schema}.etl_offsets (
	group_id TEXT NOT NULL,
	topic TEXT NOT NULL,
	partition INTEGER NOT NULL,
	next_offset BIGINT NOT NULL,
	incarnation INTEGER DEFAULT 0 NOT NULL,
	topic_id TEXT,
	run_id TEXT,
	updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	PRIMARY KEY (group_id, topic, partition)
);

CREATE TABLE IF NOT EXISTS {schema}.etl_runs (
	run_id TEXT NOT NULL,
	group_id TEXT NOT NULL,
	topic TEXT NOT NULL,
	host TEXT NOT NULL,
	pid INTEGER NOT NULL,
	started_at TIMESTAMP WITH TIME ZONE NOT NULL,
	finished_at TIMESTAMP WITH TIME ZONE,
	status TEXT NOT NULL,
	stop_reason TEXT,
	cycles INTEGER DEFAULT 0 NOT NULL,
	read BIGINT DEFAULT 0 NOT NULL,
	loaded BIGINT DEFAULT 0 NOT NULL,
	rejected BIGINT DEFAULT 0 NOT NULL,
	duplicates BIGINT DEFAULT 0 NOT NULL,
	lost_to_retention BIGINT DEFAULT 0 NOT NULL,
	start_offsets JSONB,
	end_offsets JSONB,
	error TEXT,
	heartbeat_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (run_id)
);

CREATE INDEX IF NOT EXISTS etl_runs_started_at_idx ON {schema}.etl_runs (started_at);

CREATE TABLE IF NOT EXISTS {schema}.website_metrics (
	url TEXT NOT NULL,
	status_code SMALLINT,
	response_time_ms DOUBLE PRECISION,
	regex_pattern TEXT,
	regex_matched BOOLEAN,
	checked_at TIMESTAMP WITH TIME ZONE NOT NULL,
	error TEXT,
	extra JSONB,
	topic TEXT NOT NULL,
	partition INTEGER NOT NULL,
	incarnation INTEGER DEFAULT 0 NOT NULL,
	"offset" BIGINT NOT NULL,
	kafka_timestamp TIMESTAMP WITH TIME ZONE,
	run_id TEXT NOT NULL,
	loaded_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	CONSTRAINT website_metrics_pkey PRIMARY KEY (topic, partition, incarnation, "offset")
);

CREATE INDEX IF NOT EXISTS website_metrics_checked_at_idx ON {schema}.website_metrics (checked_at);

CREATE TABLE IF NOT EXISTS {schema}.website_metrics_rejects (
	id BIGSERIAL NOT NULL,
	topic TEXT NOT NULL,
	partition INTEGER NOT NULL,
	incarnation INTEGER DEFAULT 0 NOT NULL,
	"offset" BIGINT NOT NULL,
	key BYTEA,
	headers JSONB,
	kafka_timestamp TIMESTAMP WITH TIME ZONE,
	payload BYTEA,
	payload_text TEXT,
	stage TEXT NOT NULL,
	errors JSONB NOT NULL,
	run_id TEXT NOT NULL,
	rejected_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	status TEXT DEFAULT 'new' NOT NULL,
	status_note TEXT,
	status_changed_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (id),
	CONSTRAINT website_metrics_rejects_stage_ck CHECK (stage IN ('decode', 'json', 'schema', 'database')),
	CONSTRAINT website_metrics_rejects_status_ck CHECK (status IN ('new', 'replayed', 'ignored')),
	CONSTRAINT website_metrics_rejects_message_uq UNIQUE (topic, partition, incarnation, "offset")
);

CREATE INDEX IF NOT EXISTS website_metrics_rejects_rejected_at_idx ON {schema}.website_metrics_rejects (rejected_at);
