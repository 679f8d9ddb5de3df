-- One PostgreSQL for the stack, one database per component (compose mounts this into
-- /docker-entrypoint-initdb.d; `lmforge stack up` runs the same statements).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE lmforge;
