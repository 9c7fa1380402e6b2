"""Airflow side of ckptflow: the download/convert/verify/publish operators and what they are built from.

`commands` (the `ckptflow` argv of each step, no Airflow import), `local` (subprocess runner),
`kubernetes` (node-pool presets, pod sizing, KubernetesPodOperator builder), `lineage` (asset URIs, extras,
OpenLineage datasets), `ckptflow_operators` (the operators) and `embedded` (a throwaway Airflow home for the
demo and tests). Importing this package imports nothing heavy.
"""
