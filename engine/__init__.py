"""Graft engine: pure computation (no streamlit, no plotly). See METHODS.md for the contract."""
