"""Defaults of the commands that read runs back, kept apart so their parsers' help texts can name
them without importing MLflow, requests or rich."""

MAX_LISTED_RUNS = 50  # rows of `flowmill runs list` unless --max-runs says otherwise
MAX_COMPARED_RUNS = 10  # newest runs on `flowmill ui`'s compare page when no run is named
SERVER_LOG = "mlflow-server.log"  # the output of `flowmill ui`'s mlflow server, in the runs root
