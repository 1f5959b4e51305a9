"""The demo page and its example app server (`make run` starts it; see switchd/demo/app.py)."""
