# Builds the gradclip_cuda wheel against a CUDA build of torch, installs it, and runs the tests.
#   docker build -t gradclip_cuda . && docker run --gpus all gradclip_cuda
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel

ENV TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=4 CUDA_HOME=/usr/local/cuda
RUN pip install --no-cache-dir ninja "setuptools>=77" wheel pytest hypothesis numpy
COPY . /src
RUN pip wheel --no-build-isolation --no-deps -w /wheels /src \
 && pip install --no-deps /wheels/*.whl \
 && cd / && python -c "import gradclip_cuda as g; assert g.build_info()['compiled'], g.build_info()"
# Run from outside /src so that the installed wheel, not the source folder, is imported.
WORKDIR /
CMD ["python", "-m", "pytest", "-q", "/src/tests"]
