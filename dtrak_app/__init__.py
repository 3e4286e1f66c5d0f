"""The app's own layer, above ``dtrak_core`` (which never imports it).

Streamlit glue shared by the pages: ``common`` (state in the URL, cached resources, widgets)
and ``views`` (result views). App-only pieces without Streamlit: ``card`` (the attribution
card as a picture), ``score_cache`` (scores of the targets seen so far, for reverse lookups),
``uploads`` (untrusted uploads -> target images) and ``bench`` (the app's response times,
``python -m dtrak_app.bench``).

No math here: every number the app shows comes from ``dtrak_core``. Importing this package
imports nothing, so tests and tools can use its modules without a running app.
"""
