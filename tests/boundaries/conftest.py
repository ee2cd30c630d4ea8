"""tests/boundaries: issue 16's evidence that every boundary holds (plugin mistakes, odd files, signals)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "boundaries: issue 16's boundary cases; run on their own with -m boundaries")
