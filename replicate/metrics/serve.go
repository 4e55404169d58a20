package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Path is where a Server serves the metrics.
const Path = "/metrics"

// Server serves a registry's metrics over HTTP at Path.
type Server struct {
	ln   net.Listener
	srv  *http.Server
	stop func() bool // unhooks Close from the context
	done chan struct{}
	err  error // Serve's error, once done is closed

	once     sync.Once
	closeErr error
}

// Serve listens on addr (host:port; port 0 picks one, which Addr tells) and
// serves g's metrics at Path, in the Prometheus exposition format, until ctx
// ends or Close is called. An address that cannot be listened on is an
// error at once, which names it.
func Serve(ctx context.Context, addr string, g prometheus.Gatherer) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("serve metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	s := &Server{
		ln:   ln,
		srv:  &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			s.err = err
		}
	}()
	s.stop = context.AfterFunc(ctx, func() { s.shutdown() })
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// URL is the metrics' address, http://ADDR/metrics.
func (s *Server) URL() string { return "http://" + s.ln.Addr().String() + Path }

// Close stops the server: scrapes under way get a second to finish. It
// returns what stopped serving before, if anything did. Closing again
// returns the same.
func (s *Server) Close() error {
	s.stop()
	return s.shutdown()
}

func (s *Server) shutdown() error {
	s.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			s.srv.Close()
		}
		<-s.done
		if s.err != nil {
			s.closeErr = fmt.Errorf("serve metrics on %s: %w", s.ln.Addr(), s.err)
		}
	})
	return s.closeErr
}
