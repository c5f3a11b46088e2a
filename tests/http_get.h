// A plain HTTP/1.0 GET on the loopback interface, for the tests that scrape a metrics endpoint.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

namespace loopmoe {

// The whole response (status line, headers, body) of GET `path` from 127.0.0.1:port; empty when
// the connection or the request fails.
inline std::string http_get(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\n\r\n";
  if (write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
    close(fd);
    return "";
  }
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) response.append(buffer, n);
  close(fd);
  return response;
}

// GET /metrics from `address` = "127.0.0.1:PORT".
inline std::string http_get_metrics(const std::string& address) {
  return http_get(std::stoi(address.substr(address.rfind(':') + 1)), "/metrics");
}

}  // namespace loopmoe
