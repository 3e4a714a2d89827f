# Entry points of the Kubernetes-project kind; the work is in the scripts they call.
.PHONY: image test

# The image as an OCI archive, target/image/cachevol.tar (IMAGE=localhost/cachevol:dev), built
# without a container daemon: see hack/image.sh.
image:
	bash hack/image.sh

# Everything CI runs (formatting, lints, every test, the image's smoke tests).
test:
	bash .ci/run
