// composecheck loads a Compose file with compose-go, the loader `docker compose` itself uses
// (interpolation, YAML merge keys, schema validation, and semantic checks such as depends_on
// targets), and prints the resolved model as YAML, or the error with exit status 1.
//
// tests/test_deploy_static.py builds and runs it when a Go toolchain is present, so the compose
// file is checked by the real loader on machines without the docker compose plugin.
//
// Usage: composecheck FILE
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: composecheck FILE")
		os.Exit(2)
	}
	// Variables are left unset on purpose: the file's own defaults (${X:-default}) apply.
	opts, err := cli.NewProjectOptions(os.Args[1:], cli.WithName("perkamo"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "invalid:", err)
		os.Exit(1)
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if _, err := os.Stdout.Write(out); err != nil {
		os.Exit(2)
	}
}
