"""Graft engine: pure computation (no streamlit, no plotly), in rooms from core up to tools; the
formulas it implements are in docs/methods.md. The app reaches it through engine.api, the shell
through engine.cli."""
