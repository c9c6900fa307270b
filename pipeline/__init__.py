"""The pipeline's plain logic, importable and testable without Prefect: config models, settings, the lm-eval
adapter, MLflow tracking and the registry, lineage, content fingerprints, checkpoint references, the CMA-ES
search state, tables and plots, and the demo zoo. Imports pcbcore and third-party libraries only."""
