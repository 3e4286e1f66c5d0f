"""Streamlit glue shared by the pages: state in the URL, cached resources, widgets.

No math here: every number the app shows comes from ``dtrak_core``.
"""
