// vcsim for cbtvault's integration test (tests/integration/vcsim.rs):
// govmomi's simulator package (Debian golang-github-vmware-govmomi-dev)
// behind a small main of our own. It starts an ESX or VPX model on
// loopback, serves HTTPS, prints one line
//
//	VCSIM {"url":...,"host":...,"port":...,"fingerprint":...,...}
//
// on stdout, and runs until killed (or, with -exit-on-eof, until its stdin
// closes, so that it never outlives the test that started it).
//
// TLS: -tls generated (default) serves a fresh ECDSA P-256 certificate for
// 127.0.0.1 signed by a fresh CA, whose certificate goes to -cert-out
// (PEM); -tls builtin serves the self-signed certificate the simulator
// package carries (RSA 1024 bits), written to -cert-out itself. The
// fingerprint announced is always the served certificate's.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

type datastore struct {
	Name string `json:"name"`
	Path string `json:"path"`
}

type announce struct {
	URL         string      `json:"url"`
	Host        string      `json:"host"`
	Port        string      `json:"port"`
	User        string      `json:"user"`
	Model       string      `json:"model"`
	Fingerprint string      `json:"fingerprint"`
	CertFile    string      `json:"cert_file,omitempty"`
	Datastores  []datastore `json:"datastores"`
}

// certificates makes a P-256 CA and a server certificate it signs for
// 127.0.0.1, ::1 and localhost; the server's (for tls.Config) and the
// CA's PEM (for a client's CA file).
func certificates() (tls.Certificate, []byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	ca := x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vcsim test CA (cbtvault)"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(48 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, &ca, &ca, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf := x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "vcsim (cbtvault tests)"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(48 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &leaf, caCert, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}, caPEM, nil
}

func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

func main() {
	model := flag.String("model", "esx", "esx (a standalone host) or vpx (a vCenter)")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	user := flag.String("user", "root", "the one user name accepted")
	password := flag.String("password", "", "its password (required)")
	tlsMode := flag.String("tls", "generated", "generated or builtin")
	certOut := flag.String("cert-out", "", "write the CA certificate (or the builtin one) here (PEM)")
	exitOnEOF := flag.Bool("exit-on-eof", false, "exit when stdin closes")
	flag.Parse()
	if *password == "" {
		log.Fatal("-password is required")
	}

	var m *simulator.Model
	switch *model {
	case "esx":
		m = simulator.ESX()
	case "vpx":
		m = simulator.VPX()
	default:
		log.Fatalf("-model %q: want esx or vpx", *model)
	}
	if err := m.Create(); err != nil {
		log.Fatalf("create the model: %v", err)
	}
	defer m.Remove()

	var pemBytes []byte
	switch *tlsMode {
	case "generated":
		cert, p, err := certificates()
		if err != nil {
			log.Fatalf("make a certificate: %v", err)
		}
		m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		pemBytes = p
	case "builtin":
		m.Service.TLS = new(tls.Config)
	default:
		log.Fatalf("-tls %q: want generated or builtin", *tlsMode)
	}
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}

	server := m.Service.NewServer()
	defer server.Close()
	served := server.Certificate()
	if pemBytes == nil {
		pemBytes = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: served.Raw})
	}
	if *certOut != "" {
		if err := ioutil.WriteFile(*certOut, pemBytes, 0o600); err != nil {
			log.Fatalf("write %s: %v", *certOut, err)
		}
	}

	host, port, err := net.SplitHostPort(server.URL.Host)
	if err != nil {
		log.Fatalf("server URL %s: %v", server.URL, err)
	}
	a := announce{
		URL:         server.URL.Scheme + "://" + server.URL.Host + server.URL.Path,
		Host:        host,
		Port:        port,
		User:        *user,
		Model:       *model,
		Fingerprint: fingerprint(served.Raw),
		CertFile:    *certOut,
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok {
			continue
		}
		a.Datastores = append(a.Datastores, datastore{
			Name: ds.Name,
			Path: ds.Info.GetDatastoreInfo().Url,
		})
	}
	line, err := json.Marshal(a)
	if err != nil {
		log.Fatalf("announce: %v", err)
	}
	fmt.Printf("VCSIM %s\n", line)

	done := make(chan os.Signal, 1)
	signal.Notify(done, syscall.SIGINT, syscall.SIGTERM)
	if *exitOnEOF {
		go func() {
			_, _ = io.Copy(ioutil.Discard, os.Stdin)
			done <- syscall.SIGTERM
		}()
	}
	<-done
}
