# Ozwell in a container: the pure-Python ozwell.pyz on a slim official Python image.
#   docker build -t ozwell . && docker run -p 3000:3000 -v ozwell-data:/data ozwell

FROM python:3.13-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir "shiv>=1.0.8"
COPY pyproject.toml README.md LICENSE ozwell.py ./
COPY schemas ./schemas
COPY build/pyz.py build/pyz_main.py build/pyz-requirements.txt ./build/
RUN python build/pyz.py

FROM python:3.13-slim
RUN useradd --system --uid 10001 --create-home ozwell \
 && mkdir /data && chown ozwell:ozwell /data
COPY --from=build /src/build/ozwell.pyz /opt/ozwell/ozwell.pyz
USER ozwell
ENV HOST=0.0.0.0 \
    PORT=3000 \
    OZWELL_DATA_DIR=/data
# Unpack once while building (into the user's ~/.shiv), so a container starts without
# extracting the archive.
RUN python /opt/ozwell/ozwell.pyz --version
VOLUME ["/data"]
EXPOSE 3000
# The image has no curl: Python itself asks /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '3000'), timeout=4)"]
ENTRYPOINT ["python", "/opt/ozwell/ozwell.pyz"]
