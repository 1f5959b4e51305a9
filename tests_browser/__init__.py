"""Tests in a real browser (`make test-browser`); `make test` does not collect them."""
