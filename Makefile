# Two commands for a newcomer: `make run` and `make test`. Everything else is set up on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# System packages napari's canvas needs on a headless Debian/Ubuntu machine (Xvfb + Mesa + Qt's xcb).
XVFB_PKGS := xvfb libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
	libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1
PYTEST_ARGS ?=

.PHONY: run test lint venv xvfb clean sample-data
.DEFAULT_GOAL := run

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "napari-unet needs Python 3.10 or newer; set PYTHON=python3.x")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[testing]"
	touch $(STAMP)

# Open napari with the plugin's widgets docked and the sample data loaded. .venv also holds PyQt5
# (for its smoke test), which qtpy would prefer: QT_API picks Qt6.
run: $(STAMP)
	QT_API=pyqt6 $(BIN)/napari-unet gui --sample

lint: $(STAMP)
	$(BIN)/ruff check napari_unet tests $(wildcard benchmarks sample_data)

# Whole suite + ruff. Without a display, the suite runs under Xvfb (napari's canvas needs OpenGL).
test: $(STAMP) lint
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ]; then \
		$(BIN)/python -m pytest $(PYTEST_ARGS); \
	else \
		$(MAKE) --no-print-directory xvfb && \
		xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m pytest $(PYTEST_ARGS); \
	fi

# Make sure xvfb-run exists; install it (and Mesa) when root on Debian/Ubuntu, else say what to install.
xvfb:
	@command -v xvfb-run >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Xvfb and Mesa: $(XVFB_PKGS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(XVFB_PKGS) >/dev/null; \
	else \
		echo "No display and no xvfb-run. Install these packages (Debian/Ubuntu), then run 'make test' again:"; \
		echo "  sudo apt-get install $(XVFB_PKGS)"; \
		exit 1; \
	fi

# Remake the small pretrained model shipped in the package: synthetic images, plus the real annotated
# images of DATA (a folder laid out like ../shared/pretrain; see sample_data/README.md), e.g.
# `make sample-data DATA=../shared/pretrain`.
DATA ?=
sample-data: $(STAMP)
	$(BIN)/python sample_data/make_sample_data.py $(if $(DATA),--data $(DATA))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
