# groupchat: `make run` starts the suite, `make test` runs the tests. Both set up what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
USER ?= alice
ROLES ?=

IMAGE ?= groupchat
VERSION ?= dev
CONTAINER ?= docker

.PHONY: run test bench token revoke follow unfollow seed plaza-rebuild doctor chaos gen lint lock image clean

run: $(VENV)/.installed gen/.stamp
	$(PY) -m tools.suite

test: lint
	$(PY) -m pytest

bench: $(VENV)/.installed gen/.stamp
	$(PY) -m bench.fanout
	$(PY) -m bench.direct
	$(PY) -m bench.plaza
	$(PY) -m bench.round_trips

token: $(VENV)/.installed
	@$(PY) -m tools.token $(USER) $(if $(ROLES),--roles $(ROLES))

# In a running suite: every token of USER issued so far, or only the one whose jti is JTI.
revoke: $(VENV)/.installed
	$(PY) -m tools.revoke $(USER) $(if $(JTI),--jti $(JTI))

# The platform's follow graph, for demos: `make follow A=alice B=bob` (alice follows bob).
follow unfollow: $(VENV)/.installed gen/.stamp
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make $@ A=<follower> B=<followee>"; exit 2; }
	$(PY) -m tools.platform $@ $(A) $(B)

# A living plaza in a running suite (`make run` first).
seed: $(VENV)/.installed gen/.stamp
	$(PY) -m tools.seed

# As the operator's NATS user, the only one the plaza takes a rebuild request from.
plaza-rebuild: $(VENV)/.installed gen/.stamp
	$(PY) -m tools.nats_users exec operator $(PY) -m services.plaza.rebuild

# What does not hold in a live store (MONGODB_URI, else the local suite's); exit 1 if anything.
doctor: $(VENV)/.installed gen/.stamp
	$(PY) -m tools.doctor

# In a running suite (`make run` first): SIGKILL nats-server amid joins and sends, report what
# survived; exit 1 if anything was lost. More: `make chaos CHAOS_ARGS="--runs 1 --kill groups"`.
chaos: $(VENV)/.installed gen/.stamp
	$(PY) -m tools.chaos $(CHAOS_ARGS)

gen: gen/.stamp

lint: $(VENV)/.installed gen/.stamp
	$(VENV)/bin/ruff check services tools tests bench
	$(VENV)/bin/ruff format --check services tools tests bench
	$(VENV)/bin/mypy

# The virtualenv, exactly requirements/dev.txt (made anew, so nothing outlives a changed lock),
# with the project installed editable and the generated code on its path. Needs only python3:
# the venv's own pip installs the locked pip, which installs the rest.
$(VENV)/.installed: pyproject.toml requirements/pip.txt requirements/dev.txt
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements/pip.txt
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	echo "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/groupchat-gen.pth"
	touch $@

# The lock files of every environment (requirements/*.txt), from pyproject.toml: run it after
# changing a dependency there, and commit the result. UPGRADE=1 moves every pin to the newest
# release its range admits. Any existing venv will do (uv is in it): it is not remade first.
lock:
	test -e $(VENV)/.installed || $(MAKE) $(VENV)/.installed
	$(PY) -m tools.lock $(if $(UPGRADE),--upgrade)

# Python (with .pyi stubs) generated from protos/ into gen/, mirroring the proto packages.
gen/.stamp: $(PROTOS) $(VENV)/.installed tools/protogen.py
	$(PY) -m tools.protogen gen
	touch $@

# The one container image of the suite (needs a container engine; see deploy/README.md).
image:
	$(CONTAINER) build -f deploy/Dockerfile -t $(IMAGE):$(VERSION) .

clean:
	rm -rf $(VENV) gen .run
