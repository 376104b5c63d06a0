"""lmpipe orchestrator: config, stage contract, DAG, caching, lineage and CLI."""
