# The two commands that do everything on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv (idempotent: tools/bootstrap.sh skips work when nothing changed).
PY := .venv/bin/python

.PHONY: venv demo test clean
venv:
	@bash tools/bootstrap.sh

demo: venv
	$(PY) -m ns_plugin demo

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv results .pytest_cache
