module github.com/repagent/repagent

go 1.26.8

require (
	github.com/spf13/pflag v1.0.10
	golang.org/x/sys v0.49.0
)

require github.com/pierrec/lz4/v4 v4.1.33
