#!/usr/bin/env bash
# Build a Tigase-style certificate bundle for Tern: {domain}.pem = private key + certificate + chain.
#
#   ./make-bundle.sh example.com                       # demo: a throwaway CA chain + ECDSA P-256 leaf
#   ./make-bundle.sh example.com privkey.pem cert.pem chain.pem   # assemble from real files (e.g. certbot)
#
# Output: ./example.com.pem (mode 0600), ready for `[tls] certs_dir`. Order inside the file does not matter
# to Tern, but key + leaf + intermediates is what Tigase writes and what humans expect.
# The demo mode also leaves ./demo-ca/root.pem: give it to a test client as its trust anchor.
# Never commit the resulting files: they contain private keys.
set -euo pipefail

domain="${1:?usage: $0 DOMAIN [KEY CERT [CHAIN]]}"
out="${domain}.pem"
umask 077

if [[ $# -ge 3 ]]; then
  key="$2" cert="$3" chain="${4:-}"
  # Refuse encrypted keys early; Tern cannot use them (it would need the passphrase at every start).
  if grep -q -e 'ENCRYPTED PRIVATE KEY' -e 'Proc-Type: 4,ENCRYPTED' "$key"; then
    echo "$key is encrypted; decrypt it first: openssl pkey -in $key -out decrypted-key.pem" >&2
    exit 1
  fi
  # Check that the key belongs to the certificate (compare public keys).
  if ! cmp -s <(openssl pkey -in "$key" -pubout) <(openssl x509 -in "$cert" -noout -pubkey); then
    echo "$key does not match $cert" >&2
    exit 1
  fi
  cat "$key" "$cert" ${chain:+"$chain"} > "$out"
else
  ca=demo-ca
  mkdir -p "$ca"
  # Root and intermediate CA (ECDSA P-256), valid 10 years / 5 years.
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$ca/root.key" -out "$ca/root.pem" -days 3650 -subj "/CN=Tern Demo Root CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$ca/intermediate.key" -out "$ca/intermediate.csr" -subj "/CN=Tern Demo Intermediate CA"
  openssl x509 -req -in "$ca/intermediate.csr" -CA "$ca/root.pem" -CAkey "$ca/root.key" \
    -CAcreateserial -out "$ca/intermediate.pem" -days 1825 \
    -extfile <(printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n')
  # Leaf for the XMPP domain and its subdomains (RFC 6120 §13.7.1.2: the certificate must name the
  # domain; the wildcard covers conference./upload. components).
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$ca/leaf.key" -out "$ca/leaf.csr" -subj "/CN=${domain}"
  openssl x509 -req -in "$ca/leaf.csr" -CA "$ca/intermediate.pem" -CAkey "$ca/intermediate.key" \
    -CAcreateserial -out "$ca/leaf.pem" -days 397 \
    -extfile <(printf 'subjectAltName=DNS:%s,DNS:*.%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$domain" "$domain")
  # PKCS#8 key first, then the leaf, then the intermediate (the root stays with the clients).
  openssl pkey -in "$ca/leaf.key" > "$out"
  cat "$ca/leaf.pem" "$ca/intermediate.pem" >> "$out"
  openssl verify -CAfile "$ca/root.pem" -untrusted "$ca/intermediate.pem" "$ca/leaf.pem" >/dev/null
fi

chmod 600 "$out"
echo "wrote $out:"
grep -- '-----BEGIN' "$out"
