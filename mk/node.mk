# The Node.js example client (run by the test suite).
NODE_EXAMPLE := examples/node

$(NODE_EXAMPLE)/node_modules/.installed: $(NODE_EXAMPLE)/package.json
	cd $(NODE_EXAMPLE) && npm install --no-audit --no-fund --loglevel=error
	touch $@

.PHONY: node-example
node-example: $(NODE_EXAMPLE)/node_modules/.installed

TEST_PREREQS += node-example
