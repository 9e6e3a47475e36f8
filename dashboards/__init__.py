"""Dashboards: MLflow runs → pandas DataFrames → Plotly figures (pure functions) → one self-contained HTML page."""
